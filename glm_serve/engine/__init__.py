"""The engine: sequences, block accounting, scheduler, sampler, runner and the step loop."""
