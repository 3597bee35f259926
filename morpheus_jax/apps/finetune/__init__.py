"""Fine-tuning a pretrained MORPHEUS on downstream tasks (MORPHEUS.md §4)."""
