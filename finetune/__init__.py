"""Training recipes built on instructblip_core (fine-tuning, and the small model trained from scratch)."""
