"""NSQ I/O: publish frames, pynsq connections read in bulk, the publisher, readers, nsqd admin."""
