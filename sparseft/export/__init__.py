"""Export: adapter files, merged models, applying adapters to a base model."""
