"""What users run: pretraining, fine-tuning, downstream evaluation, export/import, scaling
studies. Each app is a library function the CLI calls."""
