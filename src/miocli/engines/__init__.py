"""Generation engines: what turns prompt ids into answer ids (see `miocli.engines.base`)."""
