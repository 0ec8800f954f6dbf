"""Dataset submission: check a local dataset file, count its tokens with the validator's tokenizer, register it."""
