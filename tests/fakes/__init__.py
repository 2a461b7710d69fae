"""In-process and standalone fakes of the upstream services the gateway talks to."""
