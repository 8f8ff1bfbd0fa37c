"""The fork's llama-* tools, one module each, side by side: each takes explicit arguments (the fork,
the files, the settings) and returns what the tool printed, parsed. Used alike by the study (sweeps,
plans, the selftest) and the CLI."""
