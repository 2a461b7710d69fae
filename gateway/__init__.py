"""A Twisted gateway from cloud PBX call events to CRM pop-ups and call history."""
