"""samsem's HTTP service: Label Studio ML backend routes on top of the ``samsem_plugin`` library."""
