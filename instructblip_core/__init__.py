"""InstructBLIP studio core: our own InstructBLIP / BLIP-2 in PyTorch, loading the official
Hugging Face checkpoints. Nothing here imports gradio."""

from .chat import ChatError, ChatSession, Turn
from .config import InstructBlipConfig, QFormerConfig, VisionConfig
from .generation import ORIGINAL_RELEASE, GenerationOptions
from .images import ImageError, ImageProcessor, load_image
from .loading import CheckpointError, load_pretrained
from .model import InstructBlipForConditionalGeneration
from .pipeline import InstructBlip
from .prompts import PromptTemplate, build_prompt
from .ranking import CandidateScores
from .video import sample_frames
from .processing import Processor

__all__ = [
    "CandidateScores",
    "ChatError",
    "ChatSession",
    "PromptTemplate",
    "Turn",
    "build_prompt",
    "sample_frames",
    "CheckpointError",
    "GenerationOptions",
    "ImageError",
    "ImageProcessor",
    "InstructBlip",
    "InstructBlipConfig",
    "InstructBlipForConditionalGeneration",
    "ORIGINAL_RELEASE",
    "Processor",
    "QFormerConfig",
    "VisionConfig",
    "load_image",
    "load_pretrained",
]
