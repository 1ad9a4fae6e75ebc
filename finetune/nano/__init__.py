"""nano: our own small InstructBLIP's world and data (issue 5; ../shared/DESIGN.md section 4).

world.py    scenes and clips, pure functions of a seed, with their ground truth
render.py   drawing them with PIL (64-96 px, anti-aliased, byte-identical per seed)
phrases.py  referring expressions, captions and sentences
tasks.py    question/answer generators per task category, and record builders
splits.py   held-in / held-out datasets (build_splits), the seed scheme, text_corpus
write.py    PNG + JSONL writing
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INSTALL_DIR = REPO / "assets" / "nano-instructblip"  # the shipped model: the recipe's --install, the default elsewhere
