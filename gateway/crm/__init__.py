"""One module per CRM: turn actions into that CRM's requests."""
