"""Instruction tuning data: blend-source loaders, InstructRetro rendering, the realized blend."""
