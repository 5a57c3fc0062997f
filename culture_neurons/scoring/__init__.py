"""Scoring items under the full model and under ablation.

- :mod:`.prompting`: multiple-choice prompts (chat template, image, letters).
- :mod:`.multiple_choice`: letter scoring with each item's vision work done once.
- :mod:`.lm`: next-token NLL of plain sentences (the language-modelling task).
- :mod:`.metrics`: accuracy / delta / flip matrices and their summaries.
"""

from culture_neurons.scoring.multiple_choice import predict as evaluate

__all__ = ["evaluate"]
