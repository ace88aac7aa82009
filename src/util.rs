//! Small helpers shared by stages that have nothing else in common.
//!
//! Owns: [`poll_once`]. Never: holds state, or knows about records, Redis or capture.

/// Poll a future once with a no-op waker: `Some(output)` if it completed at once. Used where a
/// future must make its first move now (queue a pipeline, drain the accept backlog) and is
/// awaited properly later, or not at all.
pub(crate) fn poll_once<F: std::future::Future + ?Sized>(
    f: std::pin::Pin<&mut F>,
) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}
