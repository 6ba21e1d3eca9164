"""Data: reading corpora, SentencePiece, binarized datasets, batching."""
