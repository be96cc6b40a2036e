"""A run through Flower's simulation engine: its plan (`plan`: validate, prepare), the engine
and Ray (`engine`, `processes`), one run and its resume (`runner`), many runs in one
simulation (`sweep`), the non-federated reference runs (`reference`) and the ServerApp of
`flwr run .` (`flwr_app`)."""
