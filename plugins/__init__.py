"""CIRCUS CS, the plug-ins: definitions, displays, jobs and their feedback, the job log,
results, the runner table (``runner``; one module per runner type: ``docker_runner``,
``remote_runner``) and the worker's job source (``job_source``)."""
