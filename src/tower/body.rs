//! The response body: the service's, watched so the reservation settles when it ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::hold::Hold;
use crate::denial::Error;
use crate::limiter::Limiter;
use crate::reservation::Receipt;

type Committing = Pin<Box<dyn Future<Output = Result<Receipt, Error>> + Send>>;

/// The layer's response body: a reply it wrote itself (a denial), or the inner
/// service's body, whose reservation is committed (or released) when it ends or is
/// dropped.
pub struct MeteredBody<B, L: Limiter + 'static> {
    kind: Kind<B, L>,
}

enum Kind<B, L: Limiter + 'static> {
    /// Written by the layer: a denial, a rejection, a failed commit.
    Full(Option<Bytes>),
    /// The service's body, with nothing left to settle.
    Plain(Pin<Box<B>>),
    /// The service's body; its reservation settles at its end.
    Metered {
        body: Pin<Box<B>>,
        settle: Option<Settle<L>>,
        committing: Option<Committing>,
    },
}

/// What settles a reservation when a body ends.
pub(crate) struct Settle<L: Limiter + 'static> {
    pub(crate) limiter: Arc<L>,
    pub(crate) hold: Hold<L::Reservation>,
}

impl<L: Limiter + 'static> Settle<L> {
    /// The commit of the reported usage, to be driven; or `None` when nothing was
    /// reported (the reservation is released here) or nothing is left to settle.
    fn finish(self) -> Option<Committing> {
        let reservation = self.hold.take()?;
        let usage = self.hold.reported_usage()?;
        let limiter = self.limiter;
        Some(Box::pin(async move {
            limiter.commit_usage(reservation, usage).await
        }))
    }
}

/// Drive a commit nobody will poll (the body was dropped) on the current tokio
/// runtime. Without one it is dropped unpolled, and the reservation inside it is
/// released: the usage is lost, never charged twice.
fn detach(commit: Committing) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(commit);
    }
}

impl<B, L: Limiter + 'static> MeteredBody<B, L> {
    pub(crate) fn full(bytes: Bytes) -> Self {
        MeteredBody {
            kind: Kind::Full(Some(bytes)),
        }
    }

    pub(crate) fn plain(body: B) -> Self {
        MeteredBody {
            kind: Kind::Plain(Box::pin(body)),
        }
    }

    pub(crate) fn metered(body: B, settle: Settle<L>) -> Self {
        MeteredBody {
            kind: Kind::Metered {
                body: Box::pin(body),
                settle: Some(settle),
                committing: None,
            },
        }
    }
}

impl<B, L> Body for MeteredBody<B, L>
where
    B: Body<Data = Bytes>,
    L: Limiter + 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Plain(body) => body.as_mut().poll_frame(cx),
            Kind::Metered {
                body,
                settle,
                committing,
            } => loop {
                if let Some(commit) = committing {
                    // A failed commit is the store's to report (its failed-commit
                    // count, `last_store_error`, tracing): the answer was delivered.
                    let _ = ready!(commit.as_mut().poll(cx));
                    *committing = None;
                    return Poll::Ready(None);
                }
                match ready!(body.as_mut().poll_frame(cx)) {
                    Some(Ok(frame)) => return Poll::Ready(Some(Ok(frame))),
                    Some(Err(error)) => {
                        // Cut short: charge what was reported as sent, else release.
                        if let Some(commit) = settle.take().and_then(Settle::finish) {
                            detach(commit);
                        }
                        return Poll::Ready(Some(Err(error)));
                    }
                    None => match settle.take().and_then(Settle::finish) {
                        Some(commit) => *committing = Some(commit),
                        None => return Poll::Ready(None),
                    },
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Plain(body) => body.is_end_stream(),
            // Polled to its end even when empty, so the reservation settles there.
            Kind::Metered {
                body,
                settle,
                committing,
            } => settle.is_none() && committing.is_none() && body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Plain(body) | Kind::Metered { body, .. } => body.size_hint(),
        }
    }
}

impl<B, L: Limiter + 'static> Drop for MeteredBody<B, L> {
    fn drop(&mut self) {
        if let Kind::Metered {
            settle, committing, ..
        } = &mut self.kind
        {
            // The client hung up mid-body (or the body was never polled to its end):
            // charge the usage reported so far; without any, release.
            let commit = committing
                .take()
                .or_else(|| settle.take().and_then(Settle::finish));
            if let Some(commit) = commit {
                detach(commit);
            }
        }
    }
}

impl<B, L: Limiter + 'static> std::fmt::Debug for MeteredBody<B, L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Full(_) => "full",
            Kind::Plain(_) => "plain",
            Kind::Metered { .. } => "metered",
        };
        f.debug_struct("MeteredBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}
