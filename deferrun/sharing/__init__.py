"""Work shared between waiting tasks: the keys that say two triggers are the same or poll the
same thing, and the one poll loop per shared-poll key. Internal."""
