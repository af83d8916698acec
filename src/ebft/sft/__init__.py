"""Supervised fine-tuning as a third runner of the training loop: teacher-forced cross-entropy on the documents
of a training config (the quickstart's baseline, and its from-scratch pretraining)."""
