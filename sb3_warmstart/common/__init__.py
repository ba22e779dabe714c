"""Pieces every stage shares: observation normalisers and full-state checkpoints."""
