"""End-to-end tests: a real Label Studio server driving the samsem backend over HTTP."""
