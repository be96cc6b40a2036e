"""The simulator: many hospitals on one machine.

- `federation/`: the federation's store, from the config: each site's data (synthetic, or cut
  from a loaded dataset), its label noise, annotators and strategy;
- `noise/`: the label degradations (SNOW's mask noise, class flips);
- `run/`: one run or a sweep through Flower's simulation engine, its run directory and resume.
"""
