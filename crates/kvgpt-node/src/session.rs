//! `NativeSession`: one sequence held across calls (its KV cache allocated once), fed token by
//! token off the JS thread. The low-level API under incremental use and the step benchmarks.

use crate::error::{to_napi, IntoNapi};
use crate::model::to_ids;
use kvgpt::{Error, Model, Session};
use napi::bindgen_prelude::AsyncTask;
use napi::{Env, Task};
use napi_derive::napi;
use std::sync::{Arc, Mutex};

#[napi]
pub struct NativeSession {
    model: Arc<Model>,
    session: Arc<Mutex<Session>>,
}

impl NativeSession {
    pub(crate) fn new(model: Arc<Model>, capacity: usize, use_cache: bool) -> napi::Result<Self> {
        let session = Session::new(model.gpt2(), capacity, use_cache).napi()?;
        Ok(Self { model, session: Arc::new(Mutex::new(session)) })
    }
}

fn busy() -> napi::Error {
    to_napi(Error::InvalidInput("the session is poisoned by an earlier failure; start a new one".into()))
}

#[napi]
impl NativeSession {
    /// Appends ids, runs the forward pass and resolves with the most likely next id.
    #[napi(ts_return_type = "Promise<number>")]
    pub fn feed(&self, ids: Vec<f64>) -> napi::Result<AsyncTask<FeedTask>> {
        let ids = to_ids(&ids).napi()?;
        self.model.check_ids(&ids).napi()?;
        Ok(AsyncTask::new(FeedTask { model: self.model.clone(), session: self.session.clone(), ids }))
    }

    /// Keeps the first `len` tokens; the cache stays allocated.
    #[napi]
    pub fn truncate(&self, len: u32) -> napi::Result<()> {
        self.session.lock().map_err(|_| busy())?.truncate(len as usize);
        Ok(())
    }

    #[napi(getter)]
    pub fn length(&self) -> napi::Result<u32> {
        Ok(self.session.lock().map_err(|_| busy())?.tokens().len() as u32)
    }

    /// Bytes of this session's KV cache (0 without one).
    #[napi(getter)]
    pub fn cache_bytes(&self) -> napi::Result<f64> {
        Ok(self.session.lock().map_err(|_| busy())?.cache().map_or(0, |c| c.bytes()) as f64)
    }
}

pub struct FeedTask {
    model: Arc<Model>,
    session: Arc<Mutex<Session>>,
    ids: Vec<u32>,
}

impl Task for FeedTask {
    type Output = u32;
    type JsValue = u32;

    fn compute(&mut self) -> napi::Result<u32> {
        let mut session = self.session.lock().map_err(|_| busy())?;
        let logits = session.feed(self.model.gpt2(), &self.ids).napi()?;
        let row = logits.squeeze(0).map_err(Error::from).napi()?;
        kvgpt::sampling::greedy_id(&row).napi()
    }

    fn resolve(&mut self, _env: Env, next: u32) -> napi::Result<u32> {
        Ok(next)
    }
}
