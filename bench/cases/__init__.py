"""One module per op family; importing a module registers its cases (bench.registry)."""
