"""Attention that ebft computes itself: the strided packed rows (layout, masks, kernels), the padding-free
prefix-sharing rows of structured mode, and which architectures each can compute exactly."""
