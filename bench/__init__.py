"""`snowfed bench`: each workload run three ways side by side (snowfed, stock Flower, a plain
loop) in fresh processes, printing ratios (`benchmark`; stock Flower's app in `flower_app`)."""
