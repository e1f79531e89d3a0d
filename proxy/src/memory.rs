//! Giving freed memory back to the system. A burst of connections leaves the allocator's
//! heap full of freed holes between buffers that are still in use; glibc keeps those
//! pages resident until asked. On a Pi, where the whole node's mesh is meant to fit in
//! 40 MiB, the proxy asks every poll interval.

/// Returns the allocator's free pages to the kernel (`malloc_trim(0)`; glibc releases
/// whole free pages anywhere in the heap, not only at its top).
pub fn release_free_pages() {
    // SAFETY: malloc_trim takes no pointers and only walks the allocator's own free
    // lists under its lock; it is safe to call at any time from any thread.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
