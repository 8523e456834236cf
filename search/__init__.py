"""search: hyperparameter search for fine-tuning torchvision detection and segmentation models."""

__version__ = "0.1.0"
