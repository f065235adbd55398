"""Hardware profiles: one YAML per device, with storage options and sourced figures."""
