"""CycleGAN training between two manifest domains (``covidcxr synth``): config, data, losses, loop, generation."""
