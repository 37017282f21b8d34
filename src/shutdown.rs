//! The one future that starts a graceful shutdown: SIGTERM or SIGINT (Ctrl-C).

use std::future::Future;

/// Resolves on the first SIGTERM or SIGINT.
///
/// The handlers are installed when this is called, not when the future is first polled: the server
/// first polls its shutdown future only once it may already be answering calls, and a signal that
/// arrived before then met the default action and ended the process without draining. Call it inside
/// a tokio runtime, before the server can be seen.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let (interrupt, terminate) = {
        use tokio::signal::unix::{SignalKind, signal};
        (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    };
    async move {
        #[cfg(unix)]
        tokio::select! {
            () = received(interrupt, "SIGINT") => {}
            () = received(terminate, "SIGTERM") => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown signal received");
    }
}

/// Resolves when `listener` receives its signal; never, if it could not be installed.
#[cfg(unix)]
async fn received(listener: std::io::Result<tokio::signal::unix::Signal>, name: &str) {
    match listener {
        Ok(mut listener) => {
            listener.recv().await;
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for {name}; it will not stop the server");
            std::future::pending::<()>().await;
        }
    }
}
