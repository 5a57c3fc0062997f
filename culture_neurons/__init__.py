"""culture-neurons: find culture-sensitive neurons in vision-language models, test them by ablation."""

__version__ = "0.1.0"
