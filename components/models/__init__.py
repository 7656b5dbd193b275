"""Language models: the Retro decoder + encoder + chunked cross-attention, presets, freezing."""
