"""FedAlign-MoE: federated fine-tuning of Mixture-of-Experts language models under non-IID data."""

__version__ = "0.1.0"
