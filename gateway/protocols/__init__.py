"""One module per PBX family: parse its webhooks, call its API."""
