"""The serving runtime: sequences, block manager, scheduler (torch-free), model runner, engine loop."""
