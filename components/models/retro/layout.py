"""The files of a saved Retro model directory (`RetroForCausalLM.save_pretrained`): what the
model writes and what evaluators and loaders look for, named once (torch-free)."""

RETRO_CONFIG = "retro_config.json"
RETRO_WEIGHTS = "retro.safetensors"
RETRO_INDEX = "retro.safetensors.index.json"   # when the weights are sharded (streamed export)
