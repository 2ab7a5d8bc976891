"""The YAML configs a user starts from; installed as ``coe.configs`` so a wheel carries the default."""
