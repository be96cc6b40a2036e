"""The federation's store: the config's hospitals as sites with data, label noise and a local
strategy, validated up front (`resolve_federation`) and written once (`build_store`).

- `sites`: what every site has (name, strategy, noise spec, failure, model checks);
- `builder`: the dispatch and the synthetic sites;
- `datasets`: sites cut from a loaded dataset (`partition`, `annotators`)."""

from snowfed.sim.federation.builder import FederationPlan, build_store, resolve_federation

__all__ = ["FederationPlan", "build_store", "resolve_federation"]
