"""Programs on top of the pipeline: ``dalle1 eval``, ``dalle1 synth``, ``dalle1 explain``
and the web page of ``dalle1 ui``. Nothing in the package imports them but the CLI."""
