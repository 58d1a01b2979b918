"""pure PyTorch, any device: the oracles (exact k-NN, patch costs), the portable search and attention."""
