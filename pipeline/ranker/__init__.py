"""The confidence ranker (seed 000): model, losses, dataset/augmentation, training loop."""

from pipeline.ranker.model import RankerConfig, build_ranker, model_from_payload, model_payload

__all__ = ["RankerConfig", "build_ranker", "model_from_payload", "model_payload"]
