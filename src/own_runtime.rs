//! A tokio runtime on threads of its own, for the work whose CPU per message counts (the webhooks, the V2K
//! subscription): with one thread, a current-thread runtime, nothing wakes a second thread to share the work.

use tokio::runtime::Handle;

/// Its threads stop, and the runtime with them, when this is dropped (it may be dropped inside another runtime).
pub(crate) struct OwnRuntime {
    handle: Handle,
    /// Dropping it ends the thread that drives the runtime.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl OwnRuntime {
    /// `name` names its threads; one thread gives a current-thread runtime.
    pub(crate) fn new(name: &str, threads: usize) -> std::io::Result<Self> {
        let mut builder = if threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads);
            builder
        };
        let runtime = builder.thread_name(name).enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new().name(name.into()).spawn(move || {
            runtime.block_on(async {
                let _ = stopped.await;
            });
            // Whatever is still running (a connection past the shutdown budget) is dropped, not awaited.
            runtime.shutdown_background();
        })?;
        Ok(Self { handle, _stop: stop })
    }

    /// Moves a listener to this runtime, so that its connections are polled by this runtime's threads.
    pub(crate) fn adopt(&self, listener: tokio::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
        let listener = listener.into_std()?;
        self.within(|| tokio::net::TcpListener::from_std(listener))
    }

    /// Runs `make()` inside this runtime's context (what it spawns or registers belongs to this runtime's threads).
    pub(crate) fn within<T>(&self, make: impl FnOnce() -> T) -> T {
        let _context = self.handle.enter();
        make()
    }

    pub(crate) fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }
}
