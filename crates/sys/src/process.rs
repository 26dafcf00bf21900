//! Process control: fork, setsid, descriptors, pid-file locks.
