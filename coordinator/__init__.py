"""The polyarch coordinator: build API, agent channel, scheduler, state, index assembly."""
