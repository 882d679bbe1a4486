"""The training recipe, one straight line: dataset -> template -> tokens with labels -> base model + LoRA ->
training loop -> checkpoints -> merge -> publish. Modules here import torch; import them only after a claim."""
