// Injected by tests/test_report_browser.sh at the end of a copy of a moe report
// (after the page's own script). It reads what the browser built, hovers tokens
// of the per-token view the way a mouse would, and writes everything it saw as
// JSON into a pre element with the id probe-result, which the test reads from --dump-dom and
// checks against report.json. Errors are collected by the snippet the test puts
// at the top of <head> (window.__probeErrors).
(function () {
    var R = {errors: window.__probeErrors || []};
    function all(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }
    function charts(section, shape) {
        return all('#' + section + ' svg').map(function (s) { return all(shape, s).length; });
    }
    try {
        R.sections = all('section').map(function (s) { return s.id; });
        R.load = charts('load', 'rect');              // bars per layer chart
        R.training = charts('training', 'polyline');  // lines per balance chart
        R.domains = charts('domains', 'rect');        // cells per domain x expert map
        R.coactivation = charts('coactivation', 'rect');
        R.legend = all('#training .legend .key').map(function (k) {
            return [k.textContent, getComputedStyle(k).borderLeftColor];
        });
        R.strokes = all('#training svg:first-of-type polyline').map(function (l) { return getComputedStyle(l).stroke; });
        R.barFills = all('#load svg rect').map(function (r) { return getComputedStyle(r).fill; });
        var info = document.getElementById('info'), toks = all('#view .tok');
        R.tokens = toks.length;
        R.backgrounds = toks.map(function (t) { return getComputedStyle(t).backgroundColor; });
        R.before = info ? info.textContent : null;
        R.hover = [];
        var pick = [0, 1, toks.length - 1, toks.length >> 1];
        pick.forEach(function (i) {
            if (i < 0 || i >= toks.length) return;
            // a real mouse fires mouseover on the innermost element under it; it bubbles up
            var target = toks[i].firstChild && toks[i].firstChild.nodeType === 1 ? toks[i].firstChild : toks[i];
            target.dispatchEvent(new MouseEvent('mouseover', {bubbles: true, cancelable: true, view: window}));
            R.hover.push({
                i: i,
                text: info.textContent,
                head: info.querySelector('b') ? info.querySelector('b').textContent : null,
                rows: all('tr', info).slice(1).map(function (r) {
                    return Array.prototype.map.call(r.cells, function (c) { return c.textContent; });
                })
            });
        });
    } catch (e) {
        R.errors.push('probe: ' + e);
    }
    var pre = document.createElement('pre');
    pre.id = 'probe-result';
    pre.textContent = JSON.stringify(R);
    document.body.appendChild(pre);
})();
