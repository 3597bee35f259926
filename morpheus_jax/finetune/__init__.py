"""Fine-tuning a pretrained MORPHEUS on downstream tasks (MORPHEUS.md §4).

``model`` (encoder + ``final_layer`` head), ``data`` (sampled training bags, folds, few-shot
draws), ``trainer`` (AdamW + the paper's per-epoch schedule, jitted step), ``survival`` and
``classify`` (the drivers behind ``morpheus finetune``), ``linear_probe`` (baseline).
"""
