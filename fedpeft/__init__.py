"""fedpeft: federated fine-tuning of pretrained transformers with low-rank adapters."""

__version__ = "0.1.0"
