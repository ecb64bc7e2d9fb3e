"""The confidence ranker (seed 000): network models and losses, the dataset and augmentation,
the training loop, per-box features with the feature ranker (gradient-boosted trees), and
cross-validation folds. Import the submodules directly (importing the package loads no torch)."""
