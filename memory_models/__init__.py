"""Memory mechanisms for sequence models, one file each, behind one stateful interface.

Import what you need from the submodules: `memory_models.model` (SequenceModel and its config),
`memory_models.registry` (kind -> config), `memory_models.layer` (the interface). This package
never imports Ray.
"""
